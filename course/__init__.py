"""Small, boring helpers shared by every project of the course.

    errors       CourseError / ConfigError, `run_cli` (turns them into one line), `check_finite_loss`
    cli          ArgumentParser with one-line errors; flag types (positive_int, nonneg_int, finite_float,
                 float_in, probability, utf8_text, existing_file, out_dir); read_text_file; colour, warnings
    config       BaseConfig: dataclass configs with presets, validation and --field=value overrides;
                 parse_configs for several configs on one command line
    interactive  run_session: the one behaviour of every interactive tool
    clitest      test helpers: one_line_error, run_script, assert_help_works
    device       device auto-detection (cuda > mps > cpu) and seeding
    checkpoint   atomic, signal-safe save/load, stale-temp cleanup and RNG state capture for exact resume
    download     download or import a data file with progress and sha256 checks
    plots        loss curves and other line plots as PNG
    paths        REPO_ROOT and repo_path: configs' relative paths work from any directory

How a script behaves (every runnable file of every project; tests check each rule):
1. `main(argv=None)` runs through `run_cli`; the parser is `course.cli.ArgumentParser`. `--help` prints
   usage and exits 0. A runnable test_*.py ends in `run_demo(_demo, __doc__)`: `--help` works, no flags runs
   the demo.
2. Bad input ends in ONE line on stderr, `error: what went wrong; what to do`, exit status 2, never a
   traceback: bad flags (argparse types from course.cli check ranges, nan/inf and UTF-8 before anything is
   loaded), bad configs (BaseConfig refuses nan/inf in every float field unless the field's metadata is
   ALLOW_NONFINITE), bad files (read_text_file: missing, folder, empty, not UTF-8, corrupt .gz), an
   `--out_dir` that is a file, a checkpoint of another kind or whose weights do not match its config
   (check the kind and shapes before loading). Table-driven tests use course.clitest.one_line_error.
3. Several configs on one command line: `parse_configs(parser, ModelConfig, TrainConfig, ...)`, never
   hand-parsed prefixes or dummy subclasses. `--resume` refuses shape flags and an explicit `--preset`
   in one line (args.preset_given, args.overrides tell which were given).
4. Training: a loss that becomes nan/inf stops the run (`check_finite_loss`, before saving). Ctrl-C or
   SIGTERM, also during a save (save_checkpoint holds the signal until the rename is done; a second Ctrl-C
   abandons the save cleanly), ends in one line with the `--resume` command. Call
   `remove_stale_temps(out_dir)` when a run starts.
5. Interactive tools use `course.interactive.run_session`: a bad line is reported and the prompt comes back;
   an empty line does nothing; Ctrl-C stops the answer, a second Ctrl-C, Ctrl-D or /quit quits (after a
   newline); /reset starts a new conversation where there is one; non-UTF-8 input is one error line.
6. `--max_new_tokens N` adds exactly N tokens, N >= 1 (positive_int: 0 is refused); "up to the context"
   or "auto" is the flag left out (None), never 0. `None` means off/auto everywhere.
7. `--preset gpu` on a machine without CUDA prints one `warning:` line (warn_if_gpu_preset_without_gpu);
   colour only on a terminal (cli.color); torch's CUDA-not-available warnings are silenced by run_cli.
"""
