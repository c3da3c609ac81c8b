#!/usr/bin/env bash
# Create the two instance profiles cluster.yaml names, once per AWS account, with your own credentials:
#   bash iam/create-roles.sh my-study-bucket
# study-worker may read and write the study's bucket and nothing else; study-head may also start this
# cluster's workers (with the worker role only) and stop them. Neither may touch other instances or buckets.
set -euo pipefail
bucket=${1:?usage: bash iam/create-roles.sh BUCKET}
account=$(aws sts get-caller-identity --query Account --output text)
cd "$(dirname "$0")"
trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
for role in study-worker study-head; do
  policy=$(sed -e "s/STUDY_BUCKET/$bucket/g" -e "s/ACCOUNT_ID/$account/g" "${role#study-}-policy.json")
  aws iam create-role --role-name "$role" --assume-role-policy-document "$trust" >/dev/null
  aws iam put-role-policy --role-name "$role" --policy-name "$role" --policy-document "$policy"
  aws iam create-instance-profile --instance-profile-name "$role" >/dev/null
  aws iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role"
  echo "created instance profile $role"
done
