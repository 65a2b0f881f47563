"""The node agent (`meshtrain join`): membership, control socket, jobs and their workers."""

from meshtrain.agent.agent import Agent
from meshtrain.agent.jobs import JobRequest, JobResult, JobRunner, JobSink

__all__ = ["Agent", "JobRequest", "JobResult", "JobRunner", "JobSink"]
