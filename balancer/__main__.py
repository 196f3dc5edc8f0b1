"""Allow `python -m balancer`."""

from balancer.launch import main

raise SystemExit(main())
