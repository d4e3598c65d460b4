"""Tests of the bus contract's pure helpers: topic matching, answer routes, config."""

from __future__ import annotations

import pytest

from hostdev.messages.bus.contract import BusConfig, Incoming, answer_route, topic_matches


@pytest.mark.parametrize(("pattern", "key", "expected"), [
    ("agent.g1.#", "agent.g1.StartCommand", True),
    ("agent.g1.#", "agent.g1", True),
    ("agent.g1.#", "agent.g2.StartCommand", False),
    ("mgmt.#", "mgmt.g1.StartupRoutingCommand", True),
    ("host.*.Up", "host.g1.Up", True),
    ("host.*.Up", "host.g1.x.Up", False),
    ("#", "anything.at.all", True),
    ("*.b", "a.b", True),
    ("a.*", "a", False),
])
def test_topic_matches_follows_amqp_rules(pattern: str, key: str, expected: bool) -> None:
    """* matches exactly one word and # zero or more, as RabbitMQ does."""
    assert topic_matches(pattern, key) is expected


def _incoming(routing_key: str, reply_to: str | None = None) -> Incoming:
    return Incoming(message_id="m", correlation_id=None, reply_to=reply_to, user_id=None,
                    routing_key=routing_key, redelivered=False)


def test_answers_go_to_reply_to_first_then_back_along_the_route() -> None:
    """reply_to wins; else agent.<g> is answered on mgmt.<g> and vice versa; api.* has none."""
    assert answer_route(_incoming("api.X", "amq.rabbitmq.reply-to.abc"), "A") == (
        "", "amq.rabbitmq.reply-to.abc")
    assert answer_route(_incoming("agent.g1.StartCommand"), "StartAnswer") == (
        "hostdev.commands", "mgmt.g1.StartAnswer")
    assert answer_route(_incoming("mgmt.g1.StartupRoutingCommand"), "StartupAnswer") == (
        "hostdev.commands", "agent.g1.StartupAnswer")
    assert answer_route(_incoming("api.ListHostsRequest"), "HostList") is None


def test_config_derives_user_and_masks_password() -> None:
    """user_id defaults to the URL's login; safe_url hides passwords of every failover URL."""
    config = BusConfig(url="amqp://agent-g1:s3cret@a:5672/;amqp://agent-g1:s3cret@b:5672/")
    assert config.login_user() == "agent-g1"
    assert "s3cret" not in config.safe_url() and config.safe_url().count("***") == 2


def test_config_refuses_an_unknown_queue_type() -> None:
    """queue_type other than quorum/classic is a ValueError naming the choices."""
    with pytest.raises(ValueError, match="quorum' or 'classic"):
        BusConfig(queue_type="stream")
