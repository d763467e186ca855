#!/usr/bin/python3
"""Prints a chatd reply as it is written (docs/api.md, "Streaming").

    docs/examples/stream_client.py http://localhost:8080 alice "Hi there"
"""
import json
import sys
import urllib.request

base, user, message = sys.argv[1:4]
request = urllib.request.Request(f"{base}/api/chat", method="POST",
                                 data=json.dumps({"userId": user, "message": message, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
# A failure before the first piece is an ordinary HTTP error with a JSON body (urllib raises it).
with urllib.request.urlopen(request) as response:
    event = "message"
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = json.loads(line[5:])
            if event == "error":
                sys.exit(f"\nerror: {data['code']}: {data['error']}")
            if data.get("done"):
                print(f"\n[turn {data['turnId']}, {data['usage']['completion_tokens']} tokens]")
            else:
                print(data["delta"], end="", flush=True)
        elif not line:
            event = "message"
