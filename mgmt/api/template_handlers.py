"""Answers the domain template requests (``hostdev template ...``)."""

from __future__ import annotations

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import Incoming
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.pipeline import Route, always, never
from hostdev.mgmt.vms import templates


def _create(tx: TxContext, request: api.CreateTemplateRequest, _incoming: Incoming) -> Message:
    return api.TemplateList(templates=(templates.create(tx, request.name, request.xml),))


def _list(tx: TxContext, _request: api.ListTemplatesRequest, _incoming: Incoming) -> Message:
    return api.TemplateList(templates=templates.newest(tx))


def _show(tx: TxContext, request: api.ShowTemplateRequest, _incoming: Incoming) -> Message:
    return api.TemplateList(templates=(templates.show(tx, request.name, request.version),))


def _delete(tx: TxContext, request: api.DeleteTemplateRequest, _incoming: Incoming) -> Message:
    return api.TemplateList(templates=templates.remove(tx, request.name))


def template_routes() -> dict[type[Message], Route]:
    """Returns the route of each template request; changes are recorded."""
    return {
        api.CreateTemplateRequest: Route(_create, always),
        api.ListTemplatesRequest: Route(_list, never),
        api.ShowTemplateRequest: Route(_show, never),
        api.DeleteTemplateRequest: Route(_delete, always),
    }
