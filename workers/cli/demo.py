"""``run.py demo``: the seed's 14-step session persistence example, played for real.

It runs on the disk store (the seed's DETS) in a fresh temporary directory, really stops and
restarts the service between steps 6 and 8, and really waits for a 2-second TTL in step 10.
The lines it prints are the seed's "Expected Output", with real ids in place of the samples.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import trio

from ..core.service import open_session_service
from ..record.errors import SessionExpired
from ..record.session import Session


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="play the seed's 14-step example on the disk store in a temporary directory"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary store directory afterwards"
    )
    parser.set_defaults(func=lambda args: trio.run(run_demo, args))


def _ok(text: str) -> None:
    print(f"\N{CHECK MARK} {text}")


def _short(session_id: str) -> str:
    return session_id[:12] + "..."


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sessions-demo-"))
    try:
        await _play(workdir / "sessions.DETS")
    finally:
        if args.keep:
            print(f"(store kept in {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


async def _play(path: Path) -> None:
    options = {"backend": "dets", "path": str(path)}
    print("=== Session Persistence Integration Example ===\n")

    print("Step 1: Configuring DETS backend...")
    _ok(f"DETS backend configured: {path}\n")

    print("Step 2: Starting the session service...")
    async with open_session_service(**options) as sessions:
        _ok("Session service started (supervisor, manager, cleanup)\n")

        print("Step 3: Creating sessions with metadata...")
        first = await sessions.create(
            {"user_id": "user123", "auth_method": "api_key", "theme": "dark", "language": "en"},
            ttl=3600,
        )
        _ok(f"Created session 1: {_short(first)}")
        second = await sessions.create({"user_id": "user456", "auth_method": "oauth2"}, ttl=3600)
        _ok(f"Created session 2: {_short(second)}")
        _ok(f"Total sessions: {await sessions.count()}\n")

        print("Step 4: Retrieving and updating sessions...")
        session = await sessions.retrieve(first)
        _ok(f"Retrieved session 1: {session.metadata['user_id']}")
        await sessions.update(first, lambda m: {**m, "last_activity": session.last_accessed})
        _ok("Updated session 1 with last_activity\n")

        print("Step 5: Verifying DETS file...")
        _ok(f"DETS file created: {path} ({_size(path)} bytes)\n")

        print("Step 6: Stopping the service (simulating shutdown)...")
    _ok("Service stopped")
    _ok("Sessions should be persisted to disk\n")

    print("Step 7: Restarting the service...")
    async with open_session_service(**options) as sessions:
        _ok("Service restarted\n")

        print("Step 8: Restoring sessions from disk...")
        restored = await sessions.list_sessions()
        _ok(f"Restored {len(restored)} sessions")
        for s in sorted(restored, key=lambda s: s.created_at):
            print(f"  - Session: {s.id[:8]}... (User: {s.metadata['user_id']})")
        print()

        print("Step 9: Verifying restored session data...")
        session = await sessions.retrieve(first)
        _check_restored(session)
        _ok("Session 1 restored successfully")
        print(f"  User ID: {session.metadata['user_id']}")
        print(f"  Theme: {session.metadata['theme']}")
        print(f"  Language: {session.metadata['language']}\n")

        print("Step 10: Demonstrating session TTL...")
        short = await sessions.create({"user_id": "temp_user"}, ttl=2)
        _ok(f"Created short-lived session: {short[:8]}... (TTL: 2s)")
        await trio.sleep(2.2)
        try:
            await sessions.retrieve(short)
        except SessionExpired:
            pass
        else:
            raise AssertionError("the 2-second session should have expired")
        removed = await sessions.cleanup_expired()
        _ok(f"Session expired and removed from DETS ({removed} swept)\n")

        print("Step 11: Cleaning up expired sessions...")
        _ok(f"Cleaned up {await sessions.cleanup_expired()} expired sessions\n")

        print("Step 12: Deleting a session...")
        await sessions.delete(second)
        _ok(f"Deleted session: {second[:8]}...")
        _ok(f"Remaining sessions: {await sessions.count()}\n")

        print("Step 13: Checking backend configuration...")
        _ok(f"Current backend: {await sessions.get_backend()} (the seed's dets)\n")

        print("Step 14: Final cleanup...")
        await sessions.delete(first)
    _ok("Cleanup complete\n")
    print("=== Example Complete ===")


def _check_restored(session: Session) -> None:
    expected = {"user_id": "user123", "auth_method": "api_key", "theme": "dark", "language": "en"}
    for key, value in expected.items():
        if session.metadata.get(key) != value:
            raise AssertionError(f"restored session lost {key}: {session.metadata!r}")
