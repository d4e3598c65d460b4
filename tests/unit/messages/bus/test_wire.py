"""The transport-neutral message forms: what every publish carries, how answers decode."""

from __future__ import annotations

import pytest

from hostdev.messages.bus.contract import COMMANDS_EXCHANGE, DIRECT_REPLY_TO, EVENTS_EXCHANGE
from hostdev.messages.bus.wire import decode_answer, new_outgoing
from hostdev.messages.codec import encode
from hostdev.messages.commands import ErrorAnswer, StopAnswer, StopCommand
from hostdev.messages.errors import BusError, RemoteError


def test_an_outgoing_message_carries_every_hostdev_property() -> None:
    """Type, id, sender, persistence; absent optional properties are left out."""
    out = new_outgoing(StopCommand(vm_uuid="v"), exchange=COMMANDS_EXCHANGE,
                       routing_key="agent.g.StopCommand", app_id="app", user_id="alice",
                       headers={"x": 1})
    assert out.properties["type"] == "StopCommand"
    assert out.properties["content_type"] == "application/json"
    assert (out.properties["app_id"], out.properties["user_id"]) == ("app", "alice")
    assert out.properties["delivery_mode"] == 2
    assert "correlation_id" not in out.properties and "reply_to" not in out.properties
    assert out.message_id and out.headers == {"x": 1}
    assert out.body == encode(StopCommand(vm_uuid="v"))


def test_commands_are_mandatory_and_reply_to_answers_are_not_republished() -> None:
    """Mandatory follows the exchange; republishing is off only for direct reply-to."""
    def make(exchange: str, key: str) -> tuple[bool, bool]:
        out = new_outgoing(StopAnswer(vm_uuid="v"), exchange=exchange, routing_key=key,
                           app_id="a", user_id="u", message_id="m-1")
        assert out.message_id == "m-1"
        return out.mandatory, out.republish

    assert make(COMMANDS_EXCHANGE, "mgmt.g.StopAnswer") == (True, True)
    assert make(EVENTS_EXCHANGE, "vm.x.Running") == (False, True)
    assert make("", f"{DIRECT_REPLY_TO}.abc") == (False, False)


def test_an_answer_decodes_and_an_error_answer_raises() -> None:
    """decode_answer returns the typed answer, raises RemoteError with the code, or BusError."""
    assert decode_answer(encode(StopAnswer(vm_uuid="v")), "Req", "m") == StopAnswer(vm_uuid="v")
    with pytest.raises(RemoteError, match=r"Req \(message_id m\) failed remotely \[busy\]"):
        decode_answer(encode(ErrorAnswer(details="later", code="busy")), "Req", "m")
    with pytest.raises(BusError, match="undecodable"):
        decode_answer(b"{nope", "Req", "m")
