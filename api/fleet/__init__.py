"""What the API knows of the workers and upstreams that serve its queues: which workers are
alive, which queues they consume, and which remote models' circuit breakers are open."""
