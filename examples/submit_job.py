"""Submit `dsray train` as a Ray job with the Python SDK and follow it to the end.

Run (with a cluster up, e.g. `ray start --head --dashboard-host=127.0.0.1`, even on a 2-core box:
the job's 3 ranks ask for half a CPU each):
    RAY_AUTH_MODE=token python examples/submit_job.py http://127.0.0.1:8265
"""

import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient

address = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8265"
client = JobSubmissionClient(address)
job = client.submit_job(
    entrypoint="dsray train --preset debug --drivers 1 --shards 2 --cpus-per-rank 0.5 --steps 50 --name submitted "
               f"--save /tmp/dsray-job-{int(time.time())}",
    runtime_env={"working_dir": ".", "excludes": ["runs/", ".git/", "benchmarks/results/"]},
)
print("submitted", job, flush=True)
seen = 0
while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    logs = client.get_job_logs(job)  # follow the job: print what it logged since the last look
    print(f"[{status}] {logs[seen:]}" if logs[seen:].strip() else f"[{status}]", end="" if logs[seen:] else "\n",
          flush=True)
    seen = len(logs)
    time.sleep(2)
print(client.get_job_logs(job)[seen:])
print("final status:", status)
sys.exit(0 if status == JobStatus.SUCCEEDED else 1)
