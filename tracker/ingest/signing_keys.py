"""Where the signing keys come from: the setting, or a key generated once into the data dir."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tracker.ingest.tokens import Signer, SigningKeyError, generate_key
from tracker.settings import Settings, SettingsError

log = logging.getLogger("tracker.signing_keys")

KEY_FILE = "secret_key"
# Every pixel and link already sent carries a signature made with this key: without it they
# all become unverifiable (pixels record nothing, links answer 404) and nothing can bring
# them back. Said when the key is made and at every start that uses it.
_BACK_IT_UP = ("back it up with the database (docs/operations.md): if it is lost, every "
               "pixel and link already sent stops working")


def signing_keys(settings: Settings) -> str:
    """The TRACKER_SECRET_KEY value to use. With an external database it must be set: every
    node behind a load balancer has to sign and verify with the same keys."""
    if settings.secret_key:
        value = settings.secret_key
    elif settings.database_url:
        raise SettingsError("TRACKER_SECRET_KEY: required when TRACKER_DATABASE_URL is set "
                            "(use the same value on every node)")
    else:
        value = _stored_key(settings.data_dir)
    try:
        Signer.from_setting(value)
    except SigningKeyError as exc:
        raise SettingsError(f"TRACKER_SECRET_KEY: {exc}") from None
    return value


def _stored_key(data_dir: Path) -> str:
    path = data_dir / KEY_FILE
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        pass
    else:
        log.info("signing key: %s; %s", path, _BACK_IT_UP)
        return key
    data_dir.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    # O_EXCL: if two processes race here, the loser reads the winner's key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.warning("signing key generated into %s; %s", path, _BACK_IT_UP)
    return key
