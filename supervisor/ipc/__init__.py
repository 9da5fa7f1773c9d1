"""Inter-process messages: their wire form (messages), the one module that sends and
receives them with fds (channel), and the master-upgrade socket handoff (handoff)."""
