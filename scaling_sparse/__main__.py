from scaling_sparse import process_watch

process_watch.child_setup()  # a watched child: first, before absl's log handler takes sys.stderr

from scaling_sparse.cli import run  # noqa: E402

run()
