"""The balancer process and the pure decisions it rests on: host routing (Host/SNI
peeking), balancing policies, and the health/metrics endpoint."""
