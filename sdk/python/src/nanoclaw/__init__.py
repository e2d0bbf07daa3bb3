"""nanoclaw: a secure runtime for AI agents — the Python SDK.

```python
from nanoclaw import NanoClaw
agent = NanoClaw(config_path="config.yaml")
result = agent.execute(prompt="编写一个 Python 脚本计算斐波那契数列", language="python", timeout=30)
print(result.stdout)
```
"""

from ._client import NanoClaw
from ._daemon import default_socket
from ._errors import CommandExitError, DaemonUnavailable, NanoClawError, QuotaExceeded
from ._sandbox import AsyncSandbox, Sandbox
from ._types import (
    CommandResult,
    EntryInfo,
    ExecutionResult,
    ImageInfo,
    RunResult,
    SandboxInfo,
    Usage,
)

__all__ = [
    "NanoClaw",
    "Sandbox",
    "AsyncSandbox",
    "CommandResult",
    "EntryInfo",
    "SandboxInfo",
    "ImageInfo",
    "CommandExitError",
    "ExecutionResult",
    "RunResult",
    "Usage",
    "NanoClawError",
    "QuotaExceeded",
    "DaemonUnavailable",
    "default_socket",
]
__version__ = "0.1.0"
