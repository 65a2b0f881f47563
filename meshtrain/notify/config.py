"""Default notification targets and SMTP settings: a config file, overridden by the environment.

The file is `notify.ini` next to the mesh secret (`$MESHTRAIN_HOME/notify.ini`,
else `~/.config/meshtrain/notify.ini`), or whatever `MESHTRAIN_NOTIFY_CONFIG`
names. It is read by the agent that coordinates a job, when the job starts::

    [notify]
    # used for every job that names no --notify of its own
    targets = https://hooks.slack.com/services/T000/B000/XXXX
              mailto:me@example.com

    [smtp]
    host = smtp.example.com
    port = 587
    starttls = yes
    user = me@example.com
    password = app-password
    from = meshtrain@example.com

Each SMTP setting can come from the environment instead (MESHTRAIN_SMTP_HOST,
_PORT, _STARTTLS, _USER, _PASSWORD, _FROM), which wins over the file: a
password need not be written down. INI, not TOML, because Python 3.10 has
no TOML reader and the core install takes no dependency for this.
"""

from __future__ import annotations

import configparser
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from meshtrain.errors import UserError
from meshtrain.notify.targets import Target, parse_target

ENV_CONFIG = "MESHTRAIN_NOTIFY_CONFIG"
FILE_NAME = "notify.ini"
_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off", ""}


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "localhost"
    port: int = 25
    starttls: bool = False
    user: str | None = None
    password: str | None = None
    sender: str = ""

    def __repr__(self) -> str:  # never print the password
        return f"SmtpSettings({self.host}:{self.port}, starttls={self.starttls}, user={self.user!r})"


@dataclass(frozen=True)
class NotifyConfig:
    targets: tuple[Target, ...] = ()
    smtp: SmtpSettings = field(default_factory=SmtpSettings)


def config_path(env: Mapping[str, str] | None = None) -> Path:
    from meshtrain.security.secret import default_secret_path

    env = os.environ if env is None else env
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG])
    return default_secret_path(env).parent / FILE_NAME


def _flag(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UserError(f"{where}: not yes or no: {text!r}")


def load_config(env: Mapping[str, str] | None = None, path: Path | None = None) -> NotifyConfig:
    """The config (an absent file is an empty config); UserError naming the file for a bad one."""
    env = os.environ if env is None else env
    path = path or config_path(env)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text("utf-8"), source=str(path))
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    targets: list[Target] = []
    for line in parser.get("notify", "targets", fallback="").split():
        try:
            target = parse_target(line)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
        if target not in targets:
            targets.append(target)
    smtp = dict(parser.items("smtp")) if parser.has_section("smtp") else {}
    for key in ("host", "port", "starttls", "user", "password", "from"):
        value = env.get(f"MESHTRAIN_SMTP_{key.upper()}")
        if value is not None:
            smtp[key] = value
    port_text = smtp.get("port", "")
    starttls = _flag(smtp.get("starttls", "no"), f"{path} [smtp] starttls")
    if port_text and not port_text.strip().isdigit():
        raise UserError(f"{path} [smtp] port: not a number: {port_text!r}")
    port = int(port_text) if port_text else (587 if starttls else 25)
    user = smtp.get("user") or None
    sender = smtp.get("from") or user or f"meshtrain@{socket.gethostname()}"
    settings = SmtpSettings(
        host=smtp.get("host") or "localhost",
        port=port,
        starttls=starttls,
        user=user,
        password=smtp.get("password") or None,
        sender=sender,
    )
    return NotifyConfig(tuple(targets), settings)
