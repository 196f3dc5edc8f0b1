"""The worker runtime: serves connections handed over by the balancer master."""
