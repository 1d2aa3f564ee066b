"""One file per method. Each module registers its agent with `orl.agent.register`."""
