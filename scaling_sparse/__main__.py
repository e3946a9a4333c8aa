from scaling_sparse.cli import run

run()
