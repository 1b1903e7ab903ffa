"""nodemesh: a per-node service-mesh agent that balances service traffic inside the kernel."""

__version__ = "0.1.0"
