"""Operations: the local development stack (`python -m ops.devstack`, what `make run` runs) and
the files the deployment mounts (Prometheus config and alert rules, Grafana provisioning)."""
