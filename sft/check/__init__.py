"""`sft check`: every setting, file and row checked before a job waits in the queue."""
