"""What one client connection may make the server hold, and how long it may keep it waiting.

Kept by tracker's own HTTP protocol (ingest/protocol.py); apart from it, so that the bounds
an operator may ask about are read without the parser's mechanics around them.
"""

MAX_TARGET_BYTES = 8 * 1024  # a longer request target: 414
MAX_HEADER_FIELDS = 128  # more header fields: 431
MAX_HEADER_BYTES = 256 * 1024  # more bytes of header names and values: 431 (a 100 KB
# user agent still passes)
# What arrives is parsed in slices of at most this many bytes, so that the server can stop
# between two of them: when an unfinished head has grown too long, or when the client
# must read its answers before more of its requests are parsed.
FEED_BYTES = 8 * 1024
# No head within the bounds above is longer: the target, the fields, and 8 KiB for the
# rest of the request line and the fields' separators. The bytes of an unfinished head
# are counted a slice at a time (a slice that ends it may hold the next request too), so
# one slice more is allowed: 280 KiB.
MAX_HEAD_BYTES = MAX_TARGET_BYTES + MAX_HEADER_BYTES + 8 * 1024 + FEED_BYTES
# A request's head must be in this many seconds after its first byte (a tracking request
# whole: its body, if any, too), and a connection's first request must begin as long after
# it opens; else 408 (or a close, if nothing came). A real client sends a head at once, in
# one packet or a few; a slowloris client drips it to hold connections open for ever.
# nginx allows 60 s (client_header_timeout), Apache 20-40 s: 10 s is still far beyond what
# a working client needs, and a quarter of what either lets a slow client hold.
HEAD_TIMEOUT_S = 10.0
