"""Long-running services, each ``async def run(..., *, task_status)``, and the one supervision policy."""
