"""Analysis above passes and backends: candidates, costs, sensitivity, allocation, and the
mixed-precision planner that uses them."""
