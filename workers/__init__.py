"""Stream consumers: the session/round coordinator with FedAvg, records, liveness."""
