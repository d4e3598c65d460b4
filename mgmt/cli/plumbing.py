"""What every ``hostdev`` command shares: options, the bus requester, errors, output.

A command is ``(args, requester, out) -> exit status``; :func:`command` wraps
it so the parser can call it with the namespace alone (it then opens a
requester on the broker) and turns the errors a person meets into one line
on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO, TypeVar

import msgspec

from hostdev.messages.base import Message
from hostdev.messages.bus.failures import BrokerUnreachable
from hostdev.messages.errors import BusError, MessageError, RemoteError, RequestTimeout
from hostdev.messages.runtime.logging import configure_logging

#: Sends one request and returns the typed answer (raises RemoteError/RequestTimeout).
Requester = Callable[[Message, float], Message]
#: One command: the parsed arguments, a requester and the output stream; returns the status.
Command = Callable[[argparse.Namespace, Requester, TextIO], int]

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

_T = TypeVar("_T", bound=Message)


def expect(answer: Message, kind: type[_T]) -> _T:
    """Returns ``answer`` as ``kind``, or says plainly that management answered something else.

    Raises:
        BusError: the answer is of another type (usually hostdev and
            hostdev-mgmt of different versions).
    """
    if not isinstance(answer, kind):
        raise BusError(f"management answered {type(answer).__name__} where {kind.__name__} "
                       "was expected; are the hostdev CLI and hostdev-mgmt the same version?")
    return answer


def common_options() -> argparse.ArgumentParser:
    """Returns the parent parser of the options every command takes (broker, output, timeout)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--amqp-url", default=None,
                        help="broker URL (default: $HOSTDEV_AMQP_URL, amqp.url of --config, "
                             f"or {DEFAULT_AMQP_URL})")
    parent.add_argument("--config", default=None,
                        help="read amqp.url from this mgmt.properties")
    parent.add_argument("--json", action="store_true", help="print JSON for scripts")
    parent.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for management to answer (default 10)")
    return parent


def _amqp_url(args: argparse.Namespace) -> str:
    if args.amqp_url:
        return str(args.amqp_url)
    if os.environ.get("HOSTDEV_AMQP_URL"):
        return os.environ["HOSTDEV_AMQP_URL"]
    if args.config:
        from hostdev.mgmt.config import load_config
        return load_config(args.config).amqp_url
    return DEFAULT_AMQP_URL


def bus_requester(url: str) -> tuple[Requester, Callable[[], None]]:
    """Returns a requester over a real bus at ``url`` and the function that closes it."""
    from hostdev.messages.bus import Bus, BusConfig

    # No connect(): request() opens its own channel and declares nothing, so
    # the CLI works whatever queue type the daemons declared.
    bus = Bus(BusConfig(url=url, app_id="hostdev-cli"))
    return (lambda message, timeout: bus.request(message, timeout=timeout)), bus.close


def command(run_command: Command) -> Callable[..., int]:
    """Returns ``run_command`` as the parser's ``func``: a requester is opened unless given."""
    def run(args: argparse.Namespace, requester: Requester | None = None,
            out: TextIO | None = None) -> int:
        stream = out or sys.stdout
        close: Callable[[], None] = lambda: None  # noqa: E731
        try:
            if requester is None:
                # The bus logs its connection at info; a person wants only the answer.
                configure_logging("warning", json=False)
                requester, close = bus_requester(_amqp_url(args))
            return run_command(args, requester, stream)
        except RemoteError as exc:
            # The bus prefixes the request's type and id; a person needs the reason.
            reason = exc.reason.split("]: ", 1)[1] if "]: " in exc.reason else exc.reason
            print(f"error: {reason}", file=sys.stderr)
            return 1
        except BrokerUnreachable as exc:  # names the URL, the cause, and "not published"
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except RequestTimeout as exc:
            print(f"error: {exc} -- is hostdev-mgmt running and connected to the same "
                  "broker?", file=sys.stderr)
            return 1
        except (BusError, MessageError, OSError) as exc:
            print(f"error: cannot reach management over AMQP ({exc}); check --amqp-url "
                  "and that RabbitMQ is running", file=sys.stderr)
            return 1
        except ValueError as exc:  # config errors name file and line
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            close()
    return run


def print_json(value: Any, out: TextIO) -> None:
    """Writes ``value`` (messages, rows, lists of them) as indented JSON with sorted keys."""
    out.write(json.dumps(msgspec.to_builtins(value, enc_hook=str), indent=2, sort_keys=True)
              + "\n")


def show(args: argparse.Namespace, value: Any, out: TextIO,
         text: Callable[[], object]) -> int:
    """Prints an answer: ``value`` as JSON with ``--json``, else as ``text()`` writes it; 0."""
    if args.json:
        print_json(value, out)
    else:
        text()
    return 0


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    """Writes a left-aligned table with a header line; ``-`` stands for nothing."""
    cells = [[("-" if c is None or c == "" else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  + "\n")
    if not rows:
        out.write("(none)\n")
