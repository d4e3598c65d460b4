"""Domain templates: named, versioned, checked on upload, rendered for each start.

``create`` stores a new version (1 for a new name) after
``template_checks.check_template``; ``delete`` removes every version and is
refused while an offering names the template. A VM records the version it
was first started from (``VmInstance.template_version``) and keeps it: a
newer upload changes the VMs deployed after it, not those that exist.
``domain_for`` gives the domain XML a ``StartCommand`` carries.
"""

from __future__ import annotations

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from hostdev.messages.domain_template import console_path_for, render_domain
from hostdev.messages.values import TemplateRow, VmSpec
from hostdev.mgmt.errors import Conflict, InvalidRequest, NotFound
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import DomainTemplate, ServiceOffering, VmInstance
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.vms.template_checks import check_template


def _row(session: Session, template: DomainTemplate, *, with_xml: bool = False) -> TemplateRow:
    offerings = session.scalars(select(ServiceOffering.name)
                                .where(ServiceOffering.template_name == template.name)
                                .order_by(ServiceOffering.name))
    return TemplateRow(name=template.name, version=template.version,
                       created_at=template.created_at.isoformat() + "Z",
                       offerings=tuple(offerings), xml=template.xml if with_xml else "")


def find_template(session: Session, name: str, version: int | None = None) -> DomainTemplate:
    """Returns a template's newest version (or ``version``).

    Raises:
        NotFound: no such template or version; the text lists what exists.
    """
    query = select(DomainTemplate).where(DomainTemplate.name == name)
    if version is not None:
        query = query.where(DomainTemplate.version == version)
    template = session.scalar(query.order_by(DomainTemplate.version.desc()).limit(1))
    if template is not None:
        return template
    versions = ", ".join(str(v) for v in session.scalars(
        select(DomainTemplate.version).where(DomainTemplate.name == name)
        .order_by(DomainTemplate.version)))
    if versions:
        raise NotFound(f"template {name} has no version {version}; versions: {versions}")
    names = ", ".join(session.scalars(select(DomainTemplate.name).distinct()
                                      .order_by(DomainTemplate.name))) or "none yet"
    raise NotFound(f"no template is named {name!r}; templates: {names} (upload one with: "
                   "hostdev template create NAME --file domain.xml)")


def create(tx: TxContext, name: str, xml: str) -> TemplateRow:
    """Checks and stores a template as the next version of ``name``."""
    if not xml.strip():
        raise InvalidRequest(f"template {name} is empty; give a libvirt <domain> XML")
    check_template(name, xml)
    newest = tx.session.scalar(select(func.max(DomainTemplate.version))
                               .where(DomainTemplate.name == name))
    template = DomainTemplate(name=name, version=(newest or 0) + 1, xml=xml)
    tx.session.add(template)
    tx.session.flush()
    return _row(tx.session, template)


def newest(tx: TxContext) -> tuple[TemplateRow, ...]:
    """Lists every template at its newest version, by name."""
    latest = (select(DomainTemplate.name, func.max(DomainTemplate.version).label("version"))
              .group_by(DomainTemplate.name).subquery())
    templates = tx.session.scalars(
        select(DomainTemplate).join(latest, (latest.c.name == DomainTemplate.name)
                                    & (latest.c.version == DomainTemplate.version))
        .order_by(DomainTemplate.name))
    return tuple(_row(tx.session, t) for t in templates)


def show(tx: TxContext, name: str, version: int | None) -> TemplateRow:
    """Returns one version of a template with its XML."""
    return _row(tx.session, find_template(tx.session, name, version), with_xml=True)


def remove(tx: TxContext, name: str) -> tuple[TemplateRow, ...]:
    """Deletes every version of a template; refused while an offering names it.

    Raises:
        NotFound: no such template.
        Conflict: offerings name it; the text lists them.
    """
    newest_version = find_template(tx.session, name)
    row = _row(tx.session, newest_version)
    if row.offerings:
        raise Conflict(f"template {name} is used by offering(s) {', '.join(row.offerings)}; "
                       "it can be deleted once no offering names it")
    tx.session.execute(delete(DomainTemplate).where(DomainTemplate.name == name))
    return (row,)


#: The template an offering names (every start asks: one statement compiled once).
_TEMPLATE_OF = PreparedStatement(select(ServiceOffering.template_name)
                                 .where(ServiceOffering.id == bindparam("id")))


def domain_for(tx: TxContext, vm: VmInstance, spec: VmSpec) -> str:
    """Returns the domain XML a VM starts with: its template rendered, "" without one.

    The first start records the template's newest version and the console
    file on the VM; later starts render that same version.
    """
    if vm.offering_id in tx.offering_templates:  # read with the offering (a deploy)
        template_name = tx.offering_templates[vm.offering_id]
    else:
        rows = _TEMPLATE_OF.execute(tx.connection, {"id": vm.offering_id}).rows
        template_name = rows[0][0] if rows else None
    if template_name is None:
        return ""
    template = find_template(tx.session, template_name, vm.template_version)
    if vm.template_version is None:
        # Written with the VM's columns before the commit: the VM may be in no
        # session (a deploy writes it through Core).
        first = {"template_version": template.version,
                 "console_path": console_path_for(template.xml, vm.uuid) or None}
        tx.vm_values.setdefault(vm.id, {}).update(first)
        for key, value in first.items():
            set_committed_value(vm, key, value)
    return render_domain(template.xml, spec, console_path=vm.console_path or "")
