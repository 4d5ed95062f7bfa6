"""What AWS (moto) holds for one NLB, found by its DNS name: the load balancer,
each listener with its target group and health check, and the registered
targets. Run with the moto venv's python after `. .causeway/env`:

    python nlb.py HOSTNAME

Prints one line per item, tab-separated:
    lb        NAME  SCHEME  TYPE
    listener  PORT  PROTOCOL  TARGET-GROUP  TARGET-TYPE  HC-PROTOCOL  HC-PORT  HC-PATH
    target    TARGET-GROUP  ID  PORT
Exits 2 when no load balancer has that DNS name.
"""
import os
import sys

import boto3

hostname = sys.argv[1]
elb = boto3.client(
    "elbv2",
    endpoint_url=os.environ["AWS_ENDPOINT_URL"],
    region_name=os.environ.get("AWS_REGION", "us-east-1"),
)
lbs = [
    lb
    for page in elb.get_paginator("describe_load_balancers").paginate()
    for lb in page["LoadBalancers"]
    if lb["DNSName"] == hostname
]
if not lbs:
    sys.exit(2)
lb = lbs[0]
print("\t".join(["lb", lb["LoadBalancerName"], lb["Scheme"], lb["Type"]]))
targets = []
for listener in elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]:
    arn = listener["DefaultActions"][0]["TargetGroupArn"]
    tg = elb.describe_target_groups(TargetGroupArns=[arn])["TargetGroups"][0]
    print("\t".join(str(x) for x in [
        "listener", listener["Port"], listener["Protocol"], tg["TargetGroupName"],
        tg.get("TargetType", "instance"), tg.get("HealthCheckProtocol", ""),
        tg.get("HealthCheckPort", ""), tg.get("HealthCheckPath", "") or "-",
    ]))
    for health in elb.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]:
        if health.get("TargetHealth", {}).get("State") == "draining":
            continue
        target = health["Target"]
        targets.append((tg["TargetGroupName"], target["Id"], target["Port"]))
for tg, target_id, port in sorted(targets):
    print("\t".join(str(x) for x in ["target", tg, target_id, port]))
