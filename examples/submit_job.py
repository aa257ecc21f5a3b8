"""Submit `dsray train` as a Ray job with the Python SDK and follow it to the end.

Run (with a cluster up, e.g. `ray start --head --dashboard-host=127.0.0.1`):
    RAY_AUTH_MODE=token python examples/submit_job.py http://127.0.0.1:8265
"""

import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient

address = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8265"
client = JobSubmissionClient(address)
job = client.submit_job(
    entrypoint="dsray train --preset debug --drivers 1 --shards 2 --steps 50 --name submitted --save /tmp/dsray-job",
    runtime_env={"working_dir": ".", "excludes": ["runs/", ".git/", "benchmarks/results/"]},
)
print("submitted", job)
while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    time.sleep(2)
print(client.get_job_logs(job)[-2000:])
print("final status:", status)
sys.exit(0 if status == JobStatus.SUCCEEDED else 1)
