"""balancer: a master-dispatch load balancer and process supervisor for aiohttp apps."""

__version__ = "0.1.0"
