"""Mail: instrumenting HTML and MIME messages, registering them, the SMTP relay and the
Python client of the API."""
