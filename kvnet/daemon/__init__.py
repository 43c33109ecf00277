"""kvnet-node: the long-running daemon operators run, and the agent socket agents talk to.

Above the p2p layer: `config` (node.toml), `lock` (one node per data dir), `metrics` (Prometheus),
`scheduler` (the fair, bounded generation queue), `chat` (chat prompts and for-chat documents),
`openai_api` (request checks and response shapes), `service` (engine + store + network behind the
endpoints), `app` (the Starlette routes), `main` (the `kvnet-node` process). docs/agent-api.md is the spec.
"""
