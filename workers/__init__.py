"""Celery workers: each process holds one loaded model and drains its model × device queue."""
