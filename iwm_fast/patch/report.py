"""What ``patch_model`` did: each attention-like module it replaced, and each it left alone with the reason."""
import logging
from dataclasses import dataclass, field

log = logging.getLogger("iwm_fast")
_SAID = set()


def say_once(line):
    """Log ``line`` as a warning the first time it comes up in this process (a fallback's reason, say)."""
    if line not in _SAID:
        _SAID.add(line)
        log.warning("%s", line)


@dataclass(frozen=True)
class ModuleDecision:
    path: str          # dotted path from the root model, as in ``named_modules``
    module_type: str   # qualified class name of the original module
    detail: str        # for a replacement: what was recognised; for a module left alone: why


@dataclass
class PatchReport:
    backend: str
    replaced: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)

    @property
    def replaced_paths(self):
        return [d.path for d in self.replaced]

    @property
    def left_alone_reasons(self):
        return {d.path: d.detail for d in self.left_alone}

    def __str__(self):
        lines = [f"patch_model (backend={self.backend!r}): replaced {len(self.replaced)}, "
                 f"left alone {len(self.left_alone)}"]
        lines += [f"  replaced    {d.path or '<root>'} [{d.module_type}]: {d.detail}" for d in self.replaced]
        lines += [f"  left alone  {d.path or '<root>'} [{d.module_type}]: {d.detail}" for d in self.left_alone]
        return "\n".join(lines)
