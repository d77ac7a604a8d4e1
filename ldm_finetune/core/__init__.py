"""The common base every layer uses: user errors, typed config loading, atomic file writes and image IO, the
class key, the run-folder layout. No torch here: data_prep and the CLI import it cheaply."""
