"""An app whose import never finishes: a deploy that hangs (a dead database at import,
a lock never released). The master's boot timeout is what ends it."""
import threading

threading.Event().wait()
