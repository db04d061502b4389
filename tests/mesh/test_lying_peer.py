"""A peer that answers with bytes that do not match their CID is caught before anyone uses the answer."""

from __future__ import annotations

from contextlib import aclosing

import pytest
import trio

import node
from node.client import PeerClient
from node.errors import ProviderFailed
from node.mesh.host import HostConfig, make_host, run_host
from node.mesh.streams import FramedStream, StreamLimits
from node.wire import result_to_wire
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import PROTOCOL_ID as INFER
from protocols.inference.messages import Request
from protocols.records import Identity

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


async def test_a_result_whose_bytes_do_not_match_its_cid_is_refused_as_a_retryable_failure():
    honest = await node.acomplete("the truth", provider="echo", cache="no-store")
    forged = await node.acomplete("a lie", provider="echo", cache="no-store")

    async def mallory_answers(stream):  # mallory: the honest answer's CID over other bytes
        framed = FramedStream(stream, StreamLimits(), decoder=InferenceStream(Role.SERVER))
        machine = framed.decoder
        await framed.read_event()
        lie = result_to_wire(honest, peer=str(stream.muxed_conn.peer_id))
        await framed.write(machine.send(type(lie)(**{**lie.__dict__, "response": forged.response})))
        await framed.close()

    mallory = make_host(HostConfig(identity=Identity.generate(), listen=(LOOPBACK,)))
    async with run_host(mallory, [LOOPBACK]):
        mallory.set_stream_handler(INFER, mallory_answers)
        request = Request(id="r1", task="generate", prompt="the truth", provider="echo", timeout_ms=10_000)
        with trio.fail_after(15):
            async with PeerClient.connect(str(mallory.get_addrs()[0])) as client:
                with pytest.raises(ProviderFailed, match="CIDMismatch") as info:
                    async with aclosing(client.generate(request)) as items:
                        async for _ in items:
                            pass
        assert info.value.retryable, "the mesh tries the next node"
