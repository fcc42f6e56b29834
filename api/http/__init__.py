"""What every request goes through: who is calling (keys), errors in one JSON envelope, the
request's context (id, log fields, metrics), its body size and its query parameters."""
