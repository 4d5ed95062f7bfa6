"""Seeds a fresh moto server with what a cluster on AWS has before Causeway runs.

A VPC; in each of two availability zones one public subnet (tagged
kubernetes.io/role/elb) and one private subnet (kubernetes.io/role/internal-elb),
all tagged kubernetes.io/cluster/<cluster>=owned; the node security group carrying
the cluster tag; and one EC2 instance per node. Prints what it created as JSON, which
the harness turns into Node objects (spec.providerID = aws:///<az>/<instance id>).

usage: seed.py ENDPOINT REGION CLUSTER NODE_NAME...
"""

import json
import sys

import boto3


def main() -> None:
    endpoint, region, cluster, nodes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    ec2 = boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    cluster_tag = {"Key": f"kubernetes.io/cluster/{cluster}", "Value": "owned"}

    def tags(kind: str, name: str, *extra: dict) -> list:
        return [{"ResourceType": kind, "Tags": [{"Key": "Name", "Value": name}, cluster_tag, *extra]}]

    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16", TagSpecifications=tags("vpc", f"{cluster}-vpc"))["Vpc"]["VpcId"]
    zones = [f"{region}a", f"{region}b"]
    subnets = []
    for i, zone in enumerate(zones):
        for role, offset in (("elb", 0), ("internal-elb", 100)):
            kind = "public" if role == "elb" else "private"
            name = f"{cluster}-{kind}-{zone}"
            subnet = ec2.create_subnet(
                VpcId=vpc,
                CidrBlock=f"10.0.{i + offset}.0/24",
                AvailabilityZone=zone,
                TagSpecifications=tags("subnet", name, {"Key": f"kubernetes.io/role/{role}", "Value": "1"}),
            )["Subnet"]
            subnets.append({"id": subnet["SubnetId"], "zone": zone, "role": role, "name": name})

    group = ec2.create_security_group(
        GroupName=f"{cluster}-nodes",
        Description=f"nodes of {cluster}",
        VpcId=vpc,
        TagSpecifications=tags("security-group", f"{cluster}-nodes"),
    )["GroupId"]

    instances = []
    public = [s for s in subnets if s["role"] == "elb"]
    for i, node in enumerate(nodes):
        subnet = public[i % len(public)]
        instance = ec2.run_instances(
            ImageId="ami-12c6146b",
            InstanceType="t3.medium",
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet["id"],
            SecurityGroupIds=[group],
            TagSpecifications=tags("instance", node),
        )["Instances"][0]
        instances.append({"node": node, "id": instance["InstanceId"], "zone": subnet["zone"]})

    json.dump({"vpc": vpc, "subnets": subnets, "node_security_group": group, "instances": instances}, sys.stdout)


if __name__ == "__main__":
    main()
