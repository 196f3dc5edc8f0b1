"""Small real backends shipped with balancer."""
