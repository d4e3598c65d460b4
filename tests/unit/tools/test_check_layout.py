"""The layout check names long modules, import cycles and imports across the dependency rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.check_layout import check, main

PYPROJECT = """\
[tool.setuptools.package-dir]
"hostdev.messages" = "messages"
"hostdev.agent" = "agent"
"hostdev.mgmt" = "mgmt"
"hostdev.demo" = "demo"
"""

#: A tree that follows every rule: each test adds or replaces files in it.
CLEAN = {
    "messages/__init__.py": '"""Protocol."""\n',
    "messages/values.py": "X = 1\n",
    "messages/bus/__init__.py": "from hostdev.messages.bus.link import Link\n",
    "messages/bus/link.py": "import kombu\nfrom hostdev.messages import values\n",
    "messages/bus/amqp_link.py": "import amqp.exceptions\nfrom hostdev.messages.bus import link\n",
    "agent/__init__.py": "",
    "agent/daemon.py": "import libvirt\nfrom hostdev.messages.bus import Link\n",
    "mgmt/__init__.py": "",
    "mgmt/service.py": "import sqlalchemy\nfrom alembic import command\nfrom . import jobs\n",
    "mgmt/jobs.py": "from hostdev.messages.values import X\n",
    "demo/__init__.py": "",
    "demo/cloud.py": "from hostdev.agent.daemon import Agent\nimport hostdev.mgmt.service\n",
}


def project(tmp_path: Path) -> Path:
    """Writes the clean tree into ``tmp_path``; returns it."""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    for name, text in CLEAN.items():
        write(tmp_path, name, text)
    return tmp_path


def write(root: Path, name: str, text: str) -> Path:
    """Writes one more file into a project."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return root


def test_a_tree_following_every_rule_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    """No problem: nothing printed, exit status 0."""
    assert check(project(tmp_path)) == []
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""


def test_names_modules_over_400_lines_in_agent_messages_and_mgmt(tmp_path: Path) -> None:
    """401 lines is too long in the daemons and the protocol; 400 is not; the demo is free."""
    root = project(tmp_path)
    write(root, "mgmt/jobs.py", "x = 1\n" * 401)
    write(root, "messages/values.py", "X = 1\n" * 400)
    write(root, "agent/handlers.py", "y = 2\n" * 500)
    write(root, "demo/scenario.py", "z = 3\n" * 900)
    assert check(root) == [
        "agent/handlers.py: 500 lines (more than 400): hostdev.agent.handlers",
        "mgmt/jobs.py: 401 lines (more than 400): hostdev.mgmt.jobs",
    ]


def test_names_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """An import inside a function still makes the two modules depend on each other."""
    root = write(project(tmp_path), "mgmt/jobs.py",
                 "def later():\n    from hostdev.mgmt.service import run\n    return run\n")
    [problem] = check(root)
    assert problem.startswith("import cycle between hostdev.mgmt.jobs, hostdev.mgmt.service: "
                              "hostdev.mgmt.jobs -> hostdev.mgmt.service -> hostdev.mgmt.jobs")
    assert "mgmt/jobs.py:2 imports hostdev.mgmt.service" in problem
    assert "mgmt/service.py:3 imports hostdev.mgmt.jobs" in problem


def test_names_a_cycle_through_a_type_checking_import(tmp_path: Path) -> None:
    """``if TYPE_CHECKING:`` hides an import from the interpreter, not from the check."""
    root = write(project(tmp_path), "mgmt/jobs.py",
                 "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                 "    from hostdev.mgmt.service import Service\n")
    assert [p.split(":")[0] for p in check(root)] == [
        "import cycle between hostdev.mgmt.jobs, hostdev.mgmt.service"]


def test_a_from_import_of_a_submodule_imports_that_submodule(tmp_path: Path) -> None:
    """``from hostdev.mgmt import service`` imports hostdev.mgmt.service, closing a cycle."""
    root = write(project(tmp_path), "mgmt/jobs.py", "from hostdev.mgmt import service\n")
    assert [p.split(":")[0] for p in check(root)] == [
        "import cycle between hostdev.mgmt.jobs, hostdev.mgmt.service"]


def test_names_every_module_of_a_longer_cycle(tmp_path: Path) -> None:
    """Three modules in a ring are one problem naming all three."""
    root = project(tmp_path)
    write(root, "agent/a.py", "import hostdev.agent.b\n")
    write(root, "agent/b.py", "from .c import thing\n")
    write(root, "agent/c.py", "from . import a\nthing = 1\n")
    [problem] = check(root)
    assert problem.startswith("import cycle between hostdev.agent.a, hostdev.agent.b, "
                              "hostdev.agent.c: hostdev.agent.a -> hostdev.agent.b -> "
                              "hostdev.agent.c -> hostdev.agent.a")


def test_a_package_init_may_import_submodules_that_do_not_import_it_back(tmp_path: Path
                                                                          ) -> None:
    """The bus ``__init__`` imports its link, which imports a sibling: no cycle."""
    root = write(project(tmp_path), "messages/bus/link.py",
                 "from hostdev.messages.bus import amqp_link\nimport kombu\n")
    write(root, "messages/bus/amqp_link.py", "import amqp\n")
    assert check(root) == []


def test_a_submodule_importing_a_name_from_its_package_closes_a_cycle(tmp_path: Path) -> None:
    """``from hostdev.messages.bus import Link`` in a module the package imports is a cycle."""
    root = write(project(tmp_path), "messages/bus/link.py",
                 "from hostdev.messages.bus import Link as Other\nimport kombu\n")
    assert [p.split(":")[0] for p in check(root)] == [
        "import cycle between hostdev.messages.bus, hostdev.messages.bus.link"]


@pytest.mark.parametrize(("path", "text", "expected"), [
    ("agent/client.py", "from hostdev.mgmt.jobs import X\n",
     "agent/client.py:1: hostdev.agent.client imports hostdev.mgmt.jobs: "
     "the agent never imports mgmt"),
    ("mgmt/hosts.py", "def f():\n    import hostdev.agent.daemon\n",
     "mgmt/hosts.py:2: hostdev.mgmt.hosts imports hostdev.agent.daemon: "
     "mgmt never imports the agent"),
    ("messages/codec.py", "from hostdev.mgmt import service\n",
     "messages/codec.py:1: hostdev.messages.codec imports hostdev.mgmt.service: "
     "the protocol imports neither daemon"),
    ("mgmt/cli.py", "from hostdev.demo.cloud import Cloud\n",
     "mgmt/cli.py:1: hostdev.mgmt.cli imports hostdev.demo.cloud: "
     "only the CLI's entry point finds the demo"),
    ("mgmt/hosts.py", "import libvirt\n",
     "mgmt/hosts.py:1: hostdev.mgmt.hosts imports libvirt: only hostdev.agent may"),
    ("agent/store.py", "from sqlalchemy.orm import Session\n",
     "agent/store.py:1: hostdev.agent.store imports sqlalchemy: only hostdev.mgmt may"),
    ("demo/cloud.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from alembic import command\n",
     "demo/cloud.py:3: hostdev.demo.cloud imports alembic: only hostdev.mgmt may"),
    ("messages/codec.py", "import kombu.serialization\n",
     "messages/codec.py:1: hostdev.messages.codec imports kombu: "
     "only hostdev.messages.bus may"),
    ("mgmt/hosts.py", "from amqp import Connection\n",
     "mgmt/hosts.py:1: hostdev.mgmt.hosts imports amqp: only hostdev.messages.bus may"),
])
def test_names_imports_that_break_the_dependency_rule(tmp_path: Path, path: str, text: str,
                                                      expected: str) -> None:
    """Each daemon keeps to its side; libraries stay in the package that owns them."""
    root = write(project(tmp_path), path, text)
    assert check(root) == [expected]


def test_only_the_demo_imports_both_daemons(tmp_path: Path) -> None:
    """The clean tree's demo imports the agent and mgmt; messages doing so is refused."""
    root = write(project(tmp_path), "messages/both.py",
                 "import hostdev.agent.daemon\nimport hostdev.mgmt.service\n")
    assert check(root) == [
        "messages/both.py:1: hostdev.messages.both imports hostdev.agent.daemon: "
        "the protocol imports neither daemon",
        "messages/both.py:2: hostdev.messages.both imports hostdev.mgmt.service: "
        "the protocol imports neither daemon",
    ]


def test_main_prints_each_problem_and_fails(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """One line per problem on stdout, a count on stderr, exit status 1."""
    root = write(project(tmp_path), "agent/client.py", "import hostdev.mgmt.jobs\nimport libvirt\n")
    write(root, "mgmt/jobs.py", "import libvirt\n")
    assert main([str(root)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "agent/client.py:1: hostdev.agent.client imports hostdev.mgmt.jobs: "
        "the agent never imports mgmt",
        "mgmt/jobs.py:1: hostdev.mgmt.jobs imports libvirt: only hostdev.agent may",
    ]
    assert err == "layout: 2 problem(s)\n"
