"""One run per output folder: a second run into a folder that a live run is writing to is refused, with a message
naming the first. The lock is an flock on OUTPUT_DIR/.run.lock, so the kernel releases it when the holder dies
(even by SIGKILL): a killed run never leaves a stale lock behind."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from ldm_finetune.core.errors import UserError


class RunLock:
    def __init__(self, path: Path):
        self.path, self.file = Path(path), None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise UserError(f"output_dir {self.path.parent} is in use by a running training run ({holder}); "
                            "wait for it to finish, or choose another output_dir") from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
