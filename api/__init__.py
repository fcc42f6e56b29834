"""The HTTP API: accepts, validates, persists and enqueues jobs; never imports torch."""
