"""A stand-in for the two Auto Scaling calls moto 5.2 lacks, and for IMDS's lifecycle state.

It is an HTTP server on 127.0.0.1 that the agent's boto3 uses as its AWS endpoint. It answers
CompleteLifecycleAction and RecordLifecycleActionHeartbeat as AWS's Query API does (an empty
result, HTTP 200) and records them; every other AWS call is forwarded to moto unchanged. Under
/latest/ it is IMDSv2: a PUT for a token, then, only with that token, the instance id and
autoscaling/target-lifecycle-state (which the test sets, as AWS does when the group scales in).
"""
from __future__ import annotations

import http.client
import http.server
import threading
from typing import Dict, List
from urllib.parse import parse_qsl, urlsplit

TOKEN = "imds-token-1"
NS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"


class AsgStandIn:
    def __init__(self, moto: str, instance_id: str) -> None:
        self.moto = urlsplit(moto)
        self.instance_id = instance_id
        self.lifecycle_state = "InService"
        self.calls: List[Dict[str, str]] = []
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/latest/api/token":
                    return self._send(200, TOKEN.encode())
                self._send(404, b"")

            def do_GET(self) -> None:  # noqa: N802
                if self.path.startswith("/latest/"):
                    if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                        return self._send(401, b"")
                    answers = {"/latest/meta-data/instance-id": standin.instance_id,
                               "/latest/meta-data/autoscaling/target-lifecycle-state":
                                   standin.lifecycle_state}
                    if self.path in answers:
                        return self._send(200, answers[self.path].encode())
                    return self._send(404, b"")
                self._forward(None)

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                params = dict(parse_qsl(body.decode()))
                action = params.get("Action")
                if action in ("CompleteLifecycleAction", "RecordLifecycleActionHeartbeat"):
                    standin.calls.append(params)
                    xml = (f'<{action}Response xmlns="{NS}"><{action}Result/>'
                           f"<ResponseMetadata><RequestId>standin</RequestId></ResponseMetadata>"
                           f"</{action}Response>").encode()
                    return self._send(200, xml, "text/xml")
                self._forward(body)

            def _forward(self, body) -> None:
                conn = http.client.HTTPConnection(standin.moto.hostname, standin.moto.port,
                                                  timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = standin.moto.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def actions(self, name: str) -> List[Dict[str, str]]:
        return [call for call in self.calls if call.get("Action") == name]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def make_group(moto_endpoint: str, size: int):
    """An Auto Scaling group "quay" of SIZE InService instances on moto: (its client, their
    ids)."""
    import boto3

    asg = boto3.client("autoscaling", region_name="us-east-1", endpoint_url=moto_endpoint,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    asg.create_launch_configuration(LaunchConfigurationName="quay", ImageId="ami-12c6146b",
                                    InstanceType="t3.medium")
    asg.create_auto_scaling_group(AutoScalingGroupName="quay", LaunchConfigurationName="quay",
                                  MinSize=size, MaxSize=size, DesiredCapacity=size,
                                  AvailabilityZones=["us-east-1a"])
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["quay"])["AutoScalingGroups"][0]
    return asg, [instance["InstanceId"] for instance in group["Instances"]]
