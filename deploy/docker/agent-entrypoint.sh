#!/bin/sh
# Entry point of the agent image. On `rahatback-agent run` with no identity file yet, it enrolls first
# when given a one-time enrollment token (RAHATBACK_AGENT_ENROLL_TOKEN, read by `rahatback-agent enroll`
# itself, so it never appears in a process list) and the API's URL (ENROLL_API_URL; ENROLL_NAME is
# the name shown in the UI, default: the container's hostname). Any other command runs unchanged.
set -eu

config="${RAHATBACK_AGENT_CONFIG:-/var/lib/rahatback/agent.json}"

if [ "$#" -ge 2 ] && [ "$1" = "rahatback-agent" ] && [ "$2" = "run" ] && [ ! -f "$config" ]; then
    if [ -z "${RAHATBACK_AGENT_ENROLL_TOKEN:-}" ]; then
        echo "rahatback-agent: no identity at $config yet. Create an enrollment token" \
            "(POST /v1/agents/enrollment-tokens) and start again with RAHATBACK_AGENT_ENROLL_TOKEN" \
            "and ENROLL_API_URL set, or run: rahatback-agent enroll --api URL --token TOKEN" >&2
        exit 78 # EX_CONFIG: a restart alone will not fix this
    fi
    if [ -z "${ENROLL_API_URL:-}" ]; then
        echo "rahatback-agent: set ENROLL_API_URL to the API's base URL, e.g. http://api:8000" >&2
        exit 78
    fi
    if [ -n "${ENROLL_NAME:-}" ]; then
        rahatback-agent enroll --api "$ENROLL_API_URL" --config "$config" --name "$ENROLL_NAME"
    else
        rahatback-agent enroll --api "$ENROLL_API_URL" --config "$config"
    fi
fi

# the token was single-use and is spent now: keep it out of the long-running process's environment
unset RAHATBACK_AGENT_ENROLL_TOKEN
exec "$@"
