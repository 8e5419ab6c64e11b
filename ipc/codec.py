"""msgpack encoding of the wire catalogue (one encoder, one decoder per direction)."""

from __future__ import annotations

import msgspec

from ipc.messages import EngineMessage, FrontendMessage, GroupMessage, StepPlan

# What the decoders read: bytes, or a zero-copy view of a ZeroMQ frame.
Buffer = bytes | memoryview

_encoder = msgspec.msgpack.Encoder()
_frontend_decoder = msgspec.msgpack.Decoder(FrontendMessage)
_engine_decoder = msgspec.msgpack.Decoder(EngineMessage)
_plan_decoder = msgspec.msgpack.Decoder(StepPlan)
_group_decoder = msgspec.msgpack.Decoder(GroupMessage)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_frontend_message(data: Buffer) -> FrontendMessage:
    """Decode what a frontend worker sent (raises msgspec.DecodeError)."""
    return _frontend_decoder.decode(data)


def decode_engine_message(data: Buffer) -> EngineMessage:
    """Decode what the engine sent (raises msgspec.DecodeError)."""
    return _engine_decoder.decode(data)


def decode_step_plan(data: Buffer) -> StepPlan:
    """Decode the step plan rank 0 sent (raises msgspec.DecodeError)."""
    return _plan_decoder.decode(data)


def decode_group_message(data: Buffer) -> GroupMessage:
    """Decode what rank 0 sent the other ranks of a sharded engine (raises msgspec.DecodeError)."""
    return _group_decoder.decode(data)
