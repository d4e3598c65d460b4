"""Tests of the publisher-confirm window bookkeeping."""

from __future__ import annotations

from hostdev.messages.bus.confirms import ConfirmWindow, Unconfirmed


def _item(n: int) -> Unconfirmed:
    return Unconfirmed("hostdev.commands", f"agent.g.{n}", object(), True, f"id-{n}")


def test_multiple_ack_confirms_everything_up_to_the_tag() -> None:
    """basic.ack(multiple) removes every publish numbered up to the tag, no more."""
    window = ConfirmWindow()
    for n in range(5):
        window.published(_item(n))
    window.acked(3, multiple=True)
    assert list(window.pending) == [4, 5]
    window.acked(5, multiple=False)
    assert list(window.pending) == [4]


def test_deferred_acks_wait_for_all_earlier_publishes() -> None:
    """An ack held back after publish 2 is released only when 1 and 2 are both confirmed."""
    window = ConfirmWindow()
    window.published(_item(1))
    window.published(_item(2))
    window.defer("tag-a")
    window.published(_item(3))
    window.acked(2, multiple=False)
    assert window.ready() == []
    window.acked(1, multiple=False)
    assert window.ready() == ["tag-a"]


def test_deferral_with_nothing_in_flight_is_ready_at_once() -> None:
    """A handler that published nothing (and nothing is in flight) is acked at once."""
    window = ConfirmWindow()
    window.defer("tag")
    assert window.ready() == ["tag"]


def test_nack_returns_the_refused_publishes_for_republishing() -> None:
    """basic.nack(multiple) hands back the refused publishes; held acks wait for the resend."""
    window = ConfirmWindow()
    for n in range(3):
        window.published(_item(n))
    window.defer("tag")
    refused = window.nacked(2, multiple=True)
    assert [i.message_id for i in refused] == ["id-0", "id-1"]
    for item in refused:
        window.published(item)
    window.hold_back_deferred()
    window.acked(3, multiple=False)
    assert window.ready() == []
    window.acked(5, multiple=True)
    assert window.ready() == ["tag"]


def test_reset_returns_unconfirmed_in_order_and_drops_held_acks() -> None:
    """After a lost connection the unconfirmed publishes come back in order; held acks go."""
    window = ConfirmWindow()
    for n in range(3):
        window.published(_item(n))
    window.defer("stale-tag")
    window.acked(1, multiple=False)
    items = window.reset()
    assert [i.message_id for i in items] == ["id-1", "id-2"]
    assert window.seq == 0 and window.ready() == []


def test_on_confirmed_is_called_by_the_ack_of_its_own_publish_only() -> None:
    """A publish's callback runs when it is acked (alone or in a multiple ack), never when
    nacked; after a republish the new sequence number's ack calls it."""
    window = ConfirmWindow()
    confirmed: list[int] = []
    items = [Unconfirmed("hostdev.events", f"vm.{n}", object(), False, f"id-{n}",
                         on_confirmed=lambda n=n: confirmed.append(n)) for n in range(4)]
    for item in items:
        window.published(item)
    window.acked(2, multiple=True)
    assert confirmed == [0, 1]
    (refused,) = window.nacked(3, multiple=False)
    assert confirmed == [0, 1]
    window.published(refused)  # republished as 5
    window.acked(4, multiple=False)
    assert confirmed == [0, 1, 3]
    window.acked(5, multiple=True)
    assert confirmed == [0, 1, 3, 2]
