"""Errors raised by the activation store, and the base of every layer's one-line errors (the store
is the bottom layer): every message is one line naming the problem and the fix."""

from __future__ import annotations


def cli_flag(name: str) -> str:
    """A setting's command-line flag, unless its declaration names another: max_length ->
    --max-length."""
    return "--" + name.replace("_", "-")


class FixableError(Exception):
    """An error whose one-line message names the problem and the fix. Where the fix is to change
    a setting, `setting` says which, as "<options class>.<field>" for a declared option
    ("CacheOptions.dtype": backbone_worker/options.py, side_trainer/options.py) or
    "load_dataset.<argument>" for a data option ("load_dataset.text_column"), and `problem` and
    `fix` call it {setting}. str() is the command line's wording, the setting named by its flag
    (`flag`, by default the field's); an interface that names settings otherwise words the
    error with `render` (the HTTP service: api/errors.py)."""

    def __init__(
        self, problem: str, fix: str = "", *, setting: str | None = None, flag: str | None = None
    ):
        self.problem, self.fix, self.setting = problem, fix, setting
        if setting is not None and flag is None:
            flag = cli_flag(setting.rpartition(".")[2])
        super().__init__(self.render(flag or ""))

    def render(self, name: str, fix: str | None = None) -> str:
        """The message with the setting called `name`, and `fix`, if given, as the fix."""
        fix = self.fix if fix is None else fix
        return (f"{self.problem}; {fix}" if fix else self.problem).replace("{setting}", name)


class StoreError(FixableError):
    """The store is missing, foreign, unreadable or not ready for the requested operation."""


class StoreMismatchError(StoreError):
    """An existing store was built with different settings (or a different part plan)."""


class StateRangeError(StoreError):
    """A backbone state the store's dtype cannot hold (fp16 tops out at 65,504)."""


class StoreBusyError(StoreError):
    """Another run holds the store's lease (it is being written)."""


class CorruptPartError(StoreError):
    """A committed part whose bytes no longer match what was committed."""

    def __init__(self, message: str, part: int):
        super().__init__(message)
        self.part = part
