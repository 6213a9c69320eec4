"""``python -m vila2_curate.pipelines.report ROOT [ROOT ...] [--dest report.html] [--gallery N]``."""

from vila2_curate.pipelines.report.page import main

main()
