"""Small, boring helpers shared by every project of the course.

    errors      CourseError / ConfigError and `run_cli`, which turns them into one clear line
    config      BaseConfig: dataclass configs with presets, validation and --field=value overrides
    device      device auto-detection (cuda > mps > cpu) and seeding
    checkpoint  atomic save/load and RNG state capture for exact resume
    download    download or import a data file with progress and sha256 checks
    plots       loss curves and other line plots as PNG
    paths       REPO_ROOT and repo_path: configs' relative paths work from any directory
"""
