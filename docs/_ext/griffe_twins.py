"""A griffe extension: loopbridge's sync/async twins documented as the methods they are, and the
docstrings' Sphinx roles turned into links.

The twins are made when their class is defined (``fetch, afetch = twins(Queries._fetch, ...)`` in
``loopbridge/database.py``, see ``loopbridge/_twins.py``), so reading the source finds only attributes
assigned from a call. At run time each twin is a function carrying the implementation's signature
(``__signature__``, ``__wrapped__``) and its own docstring (the implementation's, with a note on how it
waits). This extension imports each class of the package once it is loaded and turns every attribute
whose value is such a function into a method: the implementation's parameters and return annotation (as
griffe read them from the source, so they still link), the twin's docstring, ``async`` for the
awaitable twin.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import griffe

__all__ = ["Twins"]


class Twins(griffe.Extension):
    """Add (or replace) a method for each twin a class defines: a function with a ``__wrapped__``
    implementation, found in the class's ``__dict__`` at run time."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for cls in _classes(pkg):
            try:
                runtime = griffe.dynamic_import(cls.path)
            except ImportError:  # an optional extra that is not installed: nothing to add
                continue
            for name, value in vars(runtime).items():
                if inspect.isfunction(value) and hasattr(value, "__wrapped__"):
                    cls.set_member(name, _method(name, value, _assigned_at(cls, name), loader))
        links = _Links(loader)
        for obj in _documented(pkg):
            if obj.docstring is not None:
                obj.docstring.value = links.rewrite(obj.docstring.value, obj)


def _assigned_at(cls: griffe.Class, name: str) -> int | None:
    """The line of the class body that assigns *name* (``fetch, afetch = twins(...)``), for the order
    of the members."""
    assignment = re.compile(rf"^\s*(\w+\s*,\s*)*{re.escape(name)}\s*(,\s*\w+\s*)*=")
    start = cls.lineno or 0
    for offset, line in enumerate(cls.lines):
        if assignment.match(line):
            return start + offset
    return None


def _classes(module: griffe.Module) -> list[griffe.Class]:
    found: list[griffe.Class] = []
    pending: list[griffe.Module | griffe.Class] = [module]
    while pending:
        current = pending.pop()
        for member in current.members.values():
            if member.is_alias:
                continue
            if isinstance(member, griffe.Class):
                found.append(member)
                pending.append(member)
            elif isinstance(member, griffe.Module):
                pending.append(member)
    return found


def _method(name: str, twin: Any, lineno: int | None, loader: griffe.GriffeLoader) -> griffe.Function:
    impl = twin.__wrapped__
    source = _implementation(impl, loader)
    if source is not None:
        parameters = griffe.Parameters(*source.parameters)
        returns = source.returns
    else:  # not read from source: the run-time signature, annotations as text
        parameters, returns = _from_signature(inspect.signature(twin))
    # The twin's docstring is the implementation's (indented as written) and a note on how it waits.
    written = impl.__doc__ or ""
    note = (twin.__doc__ or "").removeprefix(written.rstrip()).strip()
    method = griffe.Function(
        name,
        parameters=parameters,
        returns=returns,
        lineno=lineno,
        endlineno=lineno,
        docstring=griffe.Docstring(
            f"{inspect.cleandoc(written)}\n\n{note}".strip(),
            parser=loader.docstring_parser,
            parser_options=loader.docstring_options,
        ),
    )
    if inspect.iscoroutinefunction(twin):
        method.labels.add("async")
    return method


def _implementation(impl: Any, loader: griffe.GriffeLoader) -> griffe.Function | None:
    path = f"{impl.__module__}.{impl.__qualname__}"
    try:
        found = loader.modules_collection.get_member(path)
    except (KeyError, ValueError):
        return None
    return found if isinstance(found, griffe.Function) else None


def _from_signature(signature: inspect.Signature) -> tuple[griffe.Parameters, str | None]:
    kinds = {  # inspect's kinds by griffe's names for them
        inspect.Parameter.POSITIONAL_ONLY: "positional-only",
        inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional or keyword",
        inspect.Parameter.VAR_POSITIONAL: "variadic positional",
        inspect.Parameter.KEYWORD_ONLY: "keyword-only",
        inspect.Parameter.VAR_KEYWORD: "variadic keyword",
    }
    parameters = griffe.Parameters(
        *(
            griffe.Parameter(
                parameter.name,
                kind=griffe.ParameterKind(kinds[parameter.kind]),
                annotation=_text(parameter.annotation),
                default=None if parameter.default is inspect.Parameter.empty else repr(parameter.default),
            )
            for parameter in signature.parameters.values()
        )
    )
    return parameters, _text(signature.return_annotation)


def _text(annotation: object) -> str | None:
    if annotation is inspect.Parameter.empty:
        return None
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


#: A Sphinx role: ``:class:`~loopbridge.Database```, ``:meth:`close```, ``:func:`text <target>```.
_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|exc|mod|obj):`(?P<body>[^`]+)`")

#: Where the API reference's pages are: their ``::: identifier`` lines say what is rendered.
_REFERENCE = Path(__file__).resolve().parent.parent / "reference"


class _Links:
    """Which identifiers the API reference renders, and a role's Markdown: a link or code."""

    def __init__(self, loader: griffe.GriffeLoader) -> None:
        self.collection = loader.modules_collection
        self.rendered: dict[str, str] = {}  # a path it may be reached by -> the rendered identifier
        for page in sorted(_REFERENCE.glob("*.md")):
            for identifier in re.findall(r"^::: (\S+)$", page.read_text(), re.MULTILINE):
                self.rendered[identifier] = identifier
                target = self._get(identifier)
                if target is not None:
                    self.rendered.setdefault(target.canonical_path, identifier)

    def _get(self, path: str) -> griffe.Object | griffe.Alias | None:
        try:
            found: griffe.Object | griffe.Alias = self.collection.get_member(path)
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        return found

    def rewrite(self, text: str, obj: griffe.Object | griffe.Alias) -> str:
        text = _ROLE.sub(lambda match: self._markdown(match["body"], obj), text)
        # reST's "::" before an indented example: Markdown shows the indented lines as code already.
        text = re.sub(r"^[ \t]*::[ \t]*$", "", text, flags=re.MULTILINE)
        return re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.MULTILINE)

    def _markdown(self, body: str, obj: griffe.Object | griffe.Alias) -> str:
        explicit = re.fullmatch(r"(?P<text>.+?)\s*<(?P<target>[^>]+)>", body)
        if explicit:
            text, target = explicit["text"], explicit["target"]
        else:
            target = body.lstrip("~")
            text = target.rpartition(".")[2] if body.startswith("~") else target
        identifier = self._identifier(target, obj)
        return f"[`{text}`][{identifier}]" if identifier else f"`{text}`"

    def _identifier(self, target: str, obj: griffe.Object | griffe.Alias) -> str | None:
        """The rendered identifier *target* refers to, seen from *obj*'s docstring, or None."""
        head, _, rest = target.partition(".")
        scope = obj if obj.is_class or obj.is_module else obj.parent
        if head == obj.package.name:  # a full path
            path = target
        elif scope is None:
            return None
        else:  # a name seen from the docstring's scope: a member, an import, a name of the module
            try:
                path = scope.resolve(head)
            except (griffe.NameResolutionError, ValueError, KeyError):
                return None
            path = f"{path}.{rest}" if rest else path
        if path in self.rendered:
            return self.rendered[path]
        owner, _, member = path.rpartition(".")  # a public member of something rendered
        if owner in self.rendered and not member.startswith("_"):
            rendered = self._get(self.rendered[owner])
            if rendered is not None and member in rendered.all_members:
                return f"{self.rendered[owner]}.{member}"
        return None


def _documented(module: griffe.Module) -> list[griffe.Object]:
    """Every object of *module* (itself included) that is not an alias, at any depth."""
    found: list[griffe.Object] = [module]
    pending: list[griffe.Object] = [module]
    while pending:
        current = pending.pop()
        for member in current.members.values():
            if isinstance(member, griffe.Object):
                found.append(member)
                if member.is_class or member.is_module:
                    pending.append(member)
    return found
