"""p2pstore: a peer-to-peer distributed relational store for Linux devices.

Layers (lower never imports higher): errors, clock <- protocol <- store, schema
<- net <- sync <- api <- daemon. ``client`` and ``cli`` reach the daemon only
through its Unix socket.
"""

__version__ = "0.1.0"
#: 2: sync batches may carry columnar blocks (protocol/batch.py ``Block``).
#: 3: a session's receiver says what it holds per origin (protocol/messages.py ``OriginMark``).
#: 4: an auto push may carry only the sender's own changes (``SyncOpen.own``).
#: 5: an eager push's last batch may grant origin marks for the devices it forwards (protocol/batch.py ``Grant``).
#: 6: a block's rows travel field by field, a field the same in every row once (protocol/batch.py ``block_from_plain``).
#: 7: a block's field of integers that counts travels as its first value and step (protocol/batch.py ``_counted``).
PROTOCOL_VERSION = 7
