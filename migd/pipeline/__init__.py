"""The data pipeline, one way each: ``sender`` (device -> encode -> seal -> wire),
``receiver`` (wire -> open -> decode -> device), and ``buffers`` (the pooled memory
and worker threads both share, and what a migration needs of them)."""

from .buffers import (
    ACK_AUTO,
    ACK_OFTEN,
    ACK_RARELY,
    DEFAULT_INFLIGHT,
    BufferBank,
    Counters,
    Workers,
    receiver_buffers,
    rx_sizes,
    rx_slots,
    sender_buffers,
    tx_sizes,
)
from .receiver import StreamReceiver
from .sender import StreamSender

__all__ = ["ACK_AUTO", "ACK_OFTEN", "ACK_RARELY", "DEFAULT_INFLIGHT", "BufferBank", "Counters",
           "StreamReceiver", "StreamSender", "Workers", "receiver_buffers", "rx_sizes",
           "rx_slots", "sender_buffers", "tx_sizes"]
