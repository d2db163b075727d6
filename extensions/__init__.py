"""Extensions shipped with the workbench; modules.extensions loads them by name (`--extensions NAME`)."""
